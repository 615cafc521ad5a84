"""Evaluation and deployment of delivered models: perplexity with the papers' protocol, zero-shot
tasks through lm-evaluation-harness, compressed 2:4 weights (compressed-tensors' sparse-24-bitmask)
and weight-only quantization. See docs/eval.md."""
