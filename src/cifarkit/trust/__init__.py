"""What a trained model can be trusted with: predictions on the test set, calibration, likely label
errors, robustness to corruptions, and Grad-CAM explanations. Each returns data or a Figure.

May import the contracts at the package root and `data`; never training, reports or serving.
"""
