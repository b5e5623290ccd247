"""Learning: datasets and partitions, models, the local learner (TensorFlow), and how solutions are aggregated."""
