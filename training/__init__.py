"""edgecells.training: host-side model, training and evaluation (classifier, detector, slides)."""
