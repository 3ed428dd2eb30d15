"""The CPU quickstart's demo: a corpus built from data shipped inside installed packages (`corpus`:
scikit-learn's digits, standard-library docstrings) and its quality report (`quality`: a digit classifier
trained on the real digits). Not part of the training stack; needs the `demo` extra (scikit-learn).
"""
