"""Child process of the embedder crash test: a full node (``streams.node``, as ``streamvec
up`` runs it) whose embedder writes every text it is about to embed to a journal file
(one JSON string a line, flushed before the call), so the parent can count the chunks that
were embedded more than once across kills. The parent kills it with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import numpy.typing as npt

from streams.config import Settings
from streams.embed import Embedder, open_embedder
from streams.ingest import Embedders
from streams.node import open_node


class JournalingEmbedder(Embedder):
    def __init__(self, inner: Embedder, journal: TextIO) -> None:
        self.inner, self.journal = inner, journal
        self.name, self.dim, self.max_tokens = inner.name, inner.dim, inner.max_tokens

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.journal.write("".join(json.dumps(t) + "\n" for t in texts))
        self.journal.flush()  # in the OS before the work starts: survives SIGKILL
        return self.inner.embed(texts)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return self.inner.token_spans(text)


def main(data_dir: str, journal_path: str) -> None:
    journal = Path(journal_path).open("a", encoding="utf-8")  # noqa: SIM115 - process lifetime
    settings = Settings(data_dir=Path(data_dir)).check()  # ports etc. from STREAMVEC_* env
    with open_node(settings) as node:
        node.start_query_node()
        node.start_ingest(
            embedders=Embedders(lambda name: JournalingEmbedder(open_embedder(name), journal))
        )
        asyncio.run(node.serve())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
