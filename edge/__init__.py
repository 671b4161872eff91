"""edgecells.edge: the device runtime (numpy + OpenCV + one inference runtime).

Never imports TensorFlow, NNCF or tf2onnx; imports nothing from the host packages.
"""
