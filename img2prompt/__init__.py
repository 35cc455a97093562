"""img2prompt: recover a Stable-Diffusion prompt embedding by CLIP retrieval over a prompt corpus.

    import img2prompt
    with img2prompt.open_index("index/", clip_model="clip/") as index:
        vectors = index.predict(["a.png", "b.png"])        # float32 [2, 384]
        index.submission("images/", "submission.csv")

The API names load on first use, so `import img2prompt` (and the CLI's --help) stays fast.
"""

__version__ = "0.2.0"
__all__ = ["add", "build", "environment_problem", "merge", "open_index", "RetrievalSettings", "SearchResult", "SettingError", "UserError", "__version__"]


def __getattr__(name: str):
    if name in ("add", "build", "environment_problem", "merge", "open_index", "SearchResult", "RetrievalSettings", "SettingError"):
        from img2prompt import api

        return getattr(api, name)
    if name == "UserError":
        from img2prompt.errors import UserError

        return UserError
    raise AttributeError(f"module 'img2prompt' has no attribute {name!r}")
