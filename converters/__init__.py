"""The PyTorch side of m3lite: the reference model, tokenizer training, export to a model directory.

`converters.model` needs torch; `converters.tokenizer`, `converters.export_onnx` and `converters.init` do not
(they need onnx and sentencepiece), so a runtime-only install can still create random test models.
"""
