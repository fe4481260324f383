"""One linear, forkable trainer per stage, and the pipeline that chains them."""
