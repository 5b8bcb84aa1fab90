"""Networks run over images: batched inference, embeddings and their on-disk cache, FAISS retrieval."""
