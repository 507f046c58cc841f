"""One rewrite pass per quant mode. Each `run(model, config, **options)` rewrites `model` in place and returns a
ConversionResult; convert.py picks the pass from the config."""
