"""The chunk set's rows: laid out as clm.yaml's packed blocks, and the rows a run uses sample the whole corpus.

Teachers are run on the first ``representations.max_chunks`` ids and the loader shuffles within windows of
consecutive shards, so ids in corpus order trained on a few whole documents: CLM on the embedded default's
chunks ended ~6 % worse in held-out perplexity than on clm.yaml's uniformly drawn blocks. One chunk per
sequence, each with a start token, still cost +2.0 ± 0.4 % (`fusion.data.chunks`).
"""

import datasets
import numpy as np
from conftest import fusellm_overrides

from fusion.data.chunks import make_rows, row_ids, sequence_ids, usable_rows
from fusion.data.prepare import prepare_chunks
from fusion.data.rows import epoch_order
from fusion.data.text import document_splits, load_tokenizer, pack
from fusion.recipe import load_recipe
from fusion.zoo import resolve_model

USED = 96  # conftest's representations.max_chunks


def test_rows_are_packed_like_clm_blocks_and_the_used_ones_sample_the_corpus(zoo_dir, cache_dir, tmp_path):
    recipe = load_recipe("fusellm.yaml", fusellm_overrides(tmp_path / "run", zoo_dir, cache_dir))
    tok = load_tokenizer(resolve_model("zoo:target", "small", zoo_dir))
    block = recipe.data.block_size
    _, chunks, info = prepare_chunks(recipe, tok)
    assert chunks["id"] == list(range(info["chunks"]))
    numbers = np.array(chunks["row"])
    assert (np.diff(numbers) >= 0).all() and numbers[-1] == info["rows"] - 1  # a row's chunks have consecutive ids

    # The same rows as packing the shuffled documents in order (map batches of 1,000 documents), renumbered.
    train, _ = document_splits(recipe.data, recipe.seed)
    texts = train.shuffle(seed=recipe.seed)["text"]
    in_order = [tuple(row) for i in range(0, len(texts), 1000) for row in make_rows(texts[i:i + 1000], tok, block)]
    pieces = list(zip(chunks["text"], chunks["starts_document"], chunks["ends_document"]))
    bounds = [*np.flatnonzero(np.diff(numbers)) + 1, len(numbers)]
    stored = [tuple(pieces[a:b]) for a, b in zip([0, *bounds[:-1]], bounds)]
    assert len(stored) == info["rows"] and sorted(stored) == sorted(in_order) and stored != in_order
    where = {row: i for i, row in enumerate(in_order)}
    position = np.array([where[row] for row in stored])

    # Every row fills the block, as clm's packed blocks do, but for the documents' last rows and the ends of rows
    # where a document would start with fewer than 8 tokens; the stored sequences are the alignment's layout.
    lengths = np.array([len(row_ids(tok, row)) for row in stored])
    assert lengths.max() <= block and np.median(lengths) == block and lengths.mean() > block - 4
    assert [len(ids) for ids in chunks["input_ids"][:20]] == [
        len(s) for s in sequence_ids(tok, chunks["text"][:20], chunks["ends_document"][:20])]

    # The used rows come from all over the corpus, and the first epoch reads them as numbered; so does every window
    # that later epochs shuffle within: here one window of 4 shards of 16 chunks each.
    rows = usable_rows(chunks, USED)
    used = position[numbers[rows[:, 0]]]
    assert rows[-1].sum() <= USED and len(rows) >= USED * 0.8
    assert used.max() - used.min() > 0.8 * len(in_order)
    assert (epoch_order(rows[:, 0], 16, recipe.seed, 0) == rows[:, 0]).all()
    window = epoch_order(rows[:, 0], 16, recipe.seed, 1)[:48]
    assert position[numbers[window]].max() - position[numbers[window]].min() > 0.8 * len(in_order)


def test_whole_documents_in_a_row_are_exactly_clms_packing(zoo_dir):
    tok = load_tokenizer(resolve_model("zoo:target", "small", zoo_dir))
    docs = ["short one", "another short document", "def f(x):\n    return x\n" * 40, "é" * 300]  # é: 2 byte tokens
    rows = make_rows(docs, tok, block_size=64)
    first = row_ids(tok, rows[0])
    documents = datasets.Dataset.from_dict({"text": docs})
    stream = pack(documents, tok, "text", 64)[0]["input_ids"]  # clm.yaml's first block of the same documents
    assert rows[0][:2] == [("short one", True, True), ("another short document", True, True)]
    assert first == stream  # BOS text EOS BOS text EOS BOS text... : the same tokens, the same 64
    assert rows[1][0][1] is False and row_ids(tok, rows[1])[0] != tok.bos_token_id  # goes on without a start token
    assert all(len(row_ids(tok, row)) <= 64 for row in rows)
    assert "".join(p[0] for row in rows for p in row) == "".join(docs)  # no character cut in two
    assert rows[-1][-1] == ("é" * (len(rows[-1][-1][0])), False, True)
    assert make_rows(docs, tok, block_size=64) == rows  # deterministic

