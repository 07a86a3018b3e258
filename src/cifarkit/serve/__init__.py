"""A model in use: `predict` on files, the Gradio app, the Hugging Face Space folder and exports
(safetensors, ONNX, a Hub folder). They start from `weights.load` on a run directory.

May import the contracts at the package root, `data` and `trust`; never training or reports, so
that a Space carries only what the app needs.
"""
