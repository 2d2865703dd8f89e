"""The chunk set's numbering: the chunks a run uses (the first ``max_chunks`` ids) sample the whole corpus.

Teachers are run on the first ``representations.max_chunks`` ids and the loader shuffles within windows of
consecutive shards, so ids in corpus order trained on a few whole documents: CLM on the embedded default's
chunks ended ~6 % worse in held-out perplexity than on clm.yaml's uniformly drawn blocks.
"""

import numpy as np
from conftest import fusellm_overrides

from fusion.data.chunks import make_chunks
from fusion.data.fused import epoch_order
from fusion.data.prepare import prepare_chunks
from fusion.data.text import document_splits, load_tokenizer
from fusion.recipe import load_recipe
from fusion.zoo import resolve_model

USED = 96  # conftest's representations.max_chunks


def test_the_used_chunks_are_a_uniform_sample_of_the_corpus(zoo_dir, cache_dir, tmp_path):
    recipe = load_recipe("fusellm.yaml", fusellm_overrides(tmp_path / "run", zoo_dir, cache_dir))
    tok = load_tokenizer(resolve_model("zoo:target", "small", zoo_dir))
    _, chunks, info = prepare_chunks(recipe, tok)
    assert chunks["id"] == list(range(info["chunks"]))

    # The same chunks as cutting the shuffled documents in order (map batches of 1,000 documents), renumbered.
    train, _ = document_splits(recipe.data, recipe.seed)
    texts = train.shuffle(seed=recipe.seed)["text"]
    in_order = [c for i in range(0, len(texts), 1000) for c in make_chunks(texts[i:i + 1000], tok,
                                                                            recipe.data.block_size)]
    stored = list(zip(chunks["text"], chunks["ends_document"]))
    assert sorted(stored) == sorted(in_order) and stored != in_order
    document = np.cumsum([0] + [ends for _, ends in in_order[:-1]])  # a document (group) per chunk in order
    where = {c: i for i, c in enumerate(in_order)}
    position = np.array([where[c] for c in stored])

    # Chunks cut mid-document fill the block but for the start token, the EOS room and a margin of 2 tokens for
    # re-tokenization at the cut (`_MARGIN`); 8 left them 6 % short of clm's full blocks, which cost perplexity.
    lengths = np.array([len(ids) for ids in chunks["input_ids"]])
    inner = ~np.array(chunks["ends_document"])
    assert lengths.max() <= recipe.data.block_size
    assert np.median(lengths[inner]) >= recipe.data.block_size - 3

    # The used chunks come from all over the corpus, and from many more documents than the first ids in order.
    used = position[:USED]
    assert used.max() - used.min() > 0.8 * len(in_order)
    assert len(set(document[used])) > 3 * len(set(document[:USED]))
    # So does every window the loader shuffles within: here one window of 4 shards of 16 chunks each.
    window = epoch_order(np.arange(USED), 16, recipe.seed, 0)[:64]
    assert position[window].max() - position[window].min() > 0.8 * len(in_order)
