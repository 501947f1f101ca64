"""jaxtok.train: the train step, objectives and the training loop."""
