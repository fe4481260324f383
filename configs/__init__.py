"""ml_collections configs, one per stage (`get_config(arg)` with presets such as `:tiny`)."""
