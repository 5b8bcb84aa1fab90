"""Training: the run (train, resume), strategies (what trains, BatchNorm policy), the one Trainer loop, autoencoder
training, and the strategy comparison."""
