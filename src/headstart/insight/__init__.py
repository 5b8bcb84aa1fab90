"""Using and understanding a trained model: metrics, the loaded-model wrapper (predict, evaluate), the run report,
the data audit, and backbone ranking."""
