"""Evaluation of trained models: held-out loss by token kind, the POPE-style probe, the
ROC AUC of the reference weights, spread over seeds, and the report writer."""
