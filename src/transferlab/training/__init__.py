"""Training: the strategy registry and each strategy (strategies/), the LightningModule, its
callbacks and the Trainer assembly. A strategy fits and returns a TrainedModel; measuring it is
evaluation's job, writing the run directory the workflow's."""
