"""vlmkit: build vision-language models the way the field does."""

__version__ = "0.1.0"
