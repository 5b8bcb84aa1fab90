"""Image data: scan and validate folders and CSV manifests, split them (:mod:`.scan`), turn images into tensors
(:mod:`.transforms`), and fetch the ants/bees demo set (:mod:`.demo`)."""
