"""Export commands (`k4serve export onnx|tensorrt|aoti`) and their helpers: nothing here is imported at serve time."""
