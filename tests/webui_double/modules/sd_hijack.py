"""Double of modules/sd_hijack.py (A1111 1.10): only what changes the loaded model's module tree, and so its
``state_dict()`` keys. ``model_hijack.hijack(m)`` wraps the CLIP token embedding in ``EmbeddingsWithFixes``
(``.wrapped``) and the text encoder in ``FrozenCLIPEmbedderWithCustomWords`` (``.wrapped``), so a hijacked SD1
model's CLIP keys read ``cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight``;
SDXL: each ``conditioner.embedders[i]`` likewise. ``undo_hijack(m)`` restores the plain ldm/sgm tree (the WebUI
does it before loading weights and hijacks again afterwards: sd_models.load_model / reload_model_weights).
Textual-inversion fixes and attention optimisations are not modelled (they do not change keys). ``comments`` /
``clear_comments()`` as in the WebUI (cleared at the start of each generation)."""
import torch


class EmbeddingsWithFixes(torch.nn.Module):
    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key

    def forward(self, input_ids):
        return self.wrapped(input_ids)


class FrozenCLIPEmbedderWithCustomWords(torch.nn.Module):
    """sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords: the wrapped ldm FrozenCLIPEmbedder is ``.wrapped``."""

    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = hijack

    def forward(self, texts):
        return self.wrapped(texts)


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    pass


class FrozenOpenCLIPEmbedder2WithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    pass


class StableDiffusionModelHijack:
    def __init__(self):
        self.layers = None
        self.clip = None
        #: messages shown under the image (processing copies them into ``p.comment``); the built-in Lora adds
        #: "Lora not found: ..." here
        self.comments = []
        self.extra_generation_params = {}

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}

    def hijack(self, m):
        conditioner = getattr(m, "conditioner", None)
        if conditioner:
            for i in range(len(conditioner.embedders)):
                embedder = conditioner.embedders[i]
                typename = type(embedder).__name__
                if typename == "FrozenCLIPEmbedder":
                    emb = embedder.transformer.text_model.embeddings
                    emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding, self)
                    conditioner.embedders[i] = FrozenCLIPEmbedderForSDXLWithCustomWords(embedder, self)
                elif typename == "FrozenOpenCLIPEmbedder2":
                    embedder.model.token_embedding = EmbeddingsWithFixes(embedder.model.token_embedding, self,
                                                                         textual_inversion_key="clip_g")
                    conditioner.embedders[i] = FrozenOpenCLIPEmbedder2WithCustomWords(embedder, self)
        cond = getattr(m, "cond_stage_model", None)
        if cond is not None and type(cond).__name__ == "FrozenCLIPEmbedder":
            emb = cond.transformer.text_model.embeddings
            emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding, self)
            m.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(cond, self)
        self.clip = getattr(m, "cond_stage_model", None)

    def undo_hijack(self, m):
        conditioner = getattr(m, "conditioner", None)
        if conditioner:
            for i in range(len(conditioner.embedders)):
                embedder = conditioner.embedders[i]
                if isinstance(embedder, FrozenOpenCLIPEmbedder2WithCustomWords):
                    embedder.wrapped.model.token_embedding = embedder.wrapped.model.token_embedding.wrapped
                    conditioner.embedders[i] = embedder.wrapped
                elif isinstance(embedder, FrozenCLIPEmbedderForSDXLWithCustomWords):
                    emb = embedder.wrapped.transformer.text_model.embeddings
                    emb.token_embedding = emb.token_embedding.wrapped
                    conditioner.embedders[i] = embedder.wrapped
        if type(getattr(m, "cond_stage_model", None)) == FrozenCLIPEmbedderWithCustomWords:
            m.cond_stage_model = m.cond_stage_model.wrapped
            emb = m.cond_stage_model.transformer.text_model.embeddings
            if type(emb.token_embedding) == EmbeddingsWithFixes:
                emb.token_embedding = emb.token_embedding.wrapped
        self.layers = None
        self.clip = None


model_hijack = StableDiffusionModelHijack()
