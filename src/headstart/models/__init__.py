"""Networks: the backbone registry and its weights, heads, the Classifier and its file format, autoencoders.

Importing the package registers the backbone-name prefixes owned by its modules (``run:`` in :mod:`.classifier`,
``ae:`` in :mod:`.autoencoder`), so :func:`~headstart.models.backbones.create_backbone` resolves them whichever
module of the package was imported first.
"""

from headstart.models import autoencoder, classifier  # noqa: F401  (imported to register their prefixes)
