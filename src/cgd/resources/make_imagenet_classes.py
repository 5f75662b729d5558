"""Rebuild `imagenet_classes.tsv` (not imported by the package; kept for provenance).

Inputs: the timm wheel's `timm/data/_info/imagenet_synsets.txt`, `imagenet_synset_to_lemma.txt`,
`imagenet_synset_to_definition.txt` (`pip download timm --no-deps`), and WordNet 3.0's `data.noun`
(Debian package `wordnet-base`, /usr/share/wordnet/data.noun). ImageNet wnids are WordNet 3.0 noun offsets.

    python make_imagenet_classes.py TIMM_INFO_DIR WORDNET_DIR > imagenet_classes.tsv

and `wordnet_nouns.tsv.gz` (written beside this script): the WordNet 3.0 noun hypernym graph without glosses,
"S<TAB>offset<TAB>parent offsets" per synset, then "L<TAB>lemma<TAB>offset of its first (most frequent) sense".

Columns: wnid, lemmas (", "), definition, hypernyms: every ancestor synset (hypernym and instance-hypernym
closure, nearest first), each as its lemmas joined by ", ", ancestors joined by " | ".
"""

import sys
from collections import deque
from pathlib import Path


def read_nouns(path):
    nouns = {}
    for line in Path(path).read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        head = line.split(" | ")[0].split()
        off, n_words = head[0], int(head[3], 16)
        words = [head[4 + 2 * i].replace("_", " ") for i in range(n_words)]
        k = 4 + 2 * n_words
        n_ptr = int(head[k])
        parents = [head[k + 1 + 4 * i + 1] for i in range(n_ptr) if head[k + 1 + 4 * i] in ("@", "@i")]
        nouns[off] = (words, parents)
    return nouns


def ancestors(nouns, off):
    seen, out, queue = {off}, [], deque([off])
    while queue:
        for p in nouns[queue.popleft()][1]:
            if p not in seen:
                seen.add(p)
                out.append(p)
                queue.append(p)
    return out


def write_graph(nouns, index_noun, out):
    import gzip

    lines = [f"S\t{o}\t{' '.join(p)}" for o, (_, p) in sorted(nouns.items())]
    for line in Path(index_noun).read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        f = line.split()
        p_cnt = int(f[3])
        lines.append(f"L\t{f[0].replace('_', ' ')}\t{f[4 + p_cnt + 2]}")
    Path(out).write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), 9, mtime=0))


def main(info_dir, wordnet_dir):
    data_noun = Path(wordnet_dir) / "data.noun"
    info = Path(info_dir)
    wnids = info.joinpath("imagenet_synsets.txt").read_text().split()
    assert len(wnids) == 1000 and wnids == sorted(wnids)
    tab = lambda name: dict(l.split("\t", 1) for l in info.joinpath(name).read_text().splitlines() if "\t" in l)
    lemma, definition = tab("imagenet_synset_to_lemma.txt"), tab("imagenet_synset_to_definition.txt")
    nouns = read_nouns(data_noun)
    print("wnid\tlemmas\tdefinition\thypernyms")
    for w in wnids:
        hyp = " | ".join(", ".join(nouns[a][0]) for a in ancestors(nouns, w[1:]))
        print(f"{w}\t{lemma[w].strip()}\t{definition[w].strip()}\t{hyp}")
    write_graph(nouns, Path(wordnet_dir) / "index.noun", Path(__file__).with_name("wordnet_nouns.tsv.gz"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
