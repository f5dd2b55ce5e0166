"""TextModel: strings in, strings out, checked against full forward passes written here."""
import numpy as np
import pytest
import torch

from data_pipeline.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
from pretrain.layout import collate
from data_pipeline.errors import UserError
from pretrain.checkpoint.export import export_model
from pretrain.infer import TextModel, score, split_spec
from pretrain.model import BigLearner, ModelConfig


@pytest.fixture(scope="module", params=[2, 1], ids=["two_stream", "single_stream"])
def exported(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("text_api")
    rng = np.random.default_rng()
    words = "the a cat dog sat lay on under mat rug big small".split()
    (directory / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 6)) for _ in range(300)))
    train_tokenizer([directory / "corpus.txt"], directory / "tok",
                    TokenizerConfig(vocab_size=34, n_sentinels=2, byte_fallback=False, num_threads=1))
    tokenizer = Tokenizer.load(directory / "tok")
    torch.manual_seed(int(rng.integers(1 << 30)))
    model = BigLearner(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                   max_seq_len=40, attention_backend="torch", streams=request.param,
                                   bos_id=tokenizer.bos_id))
    export_model(model, directory / "model", tokenizer=tokenizer)
    export_model(model, directory / "bare", {"tokenizer_sha256": tokenizer.sha256})
    return directory, tokenizer


@torch.no_grad()
def next_token_log_probs(model, tokens, source, targets):
    """log p(x_t | x_S, earlier targets) for the LAST of `targets`, from one full forward pass
    whose batch holds only S and those targets."""
    spec = split_spec(len(tokens), source, targets)
    logits = model(collate(np.asarray(tokens)[None], [spec], pad_id=0).to_torch())[0, len(targets) - 1]
    return logits.double().log_softmax(-1)


def test_generate_greedy_equals_a_loop_of_full_passes(exported):
    directory, tokenizer = exported
    lm = TextModel.load(directory / "model")
    prompt = "the cat sat"
    ids = tokenizer.encode(prompt)
    n_new = 6
    tokens = ids + [tokenizer.pad_id] * n_new
    for k in range(n_new):
        position = len(ids) + k
        targets = list(range(len(ids), position + 1))
        tokens[position] = int(next_token_log_probs(lm.model, tokens, list(range(len(ids))), targets).argmax())
    expected = tokenizer.decode(tokens[len(ids):])
    assert lm.generate(prompt, max_new_tokens=n_new, temperature=0) == expected


def test_fill_keeps_the_text_and_reports_the_exact_log_prob(exported):
    directory, tokenizer = exported
    lm = TextModel.load(directory / "model", tokenizer=directory / "tok")
    filled = lm.fill("the [___] sat on the [___:3]", temperature=1.0, seed=int(np.random.default_rng().integers(99)))
    ids_before = tokenizer.encode("the")
    gaps = list(range(len(ids_before), len(ids_before) + 2))
    middle = tokenizer.encode("sat on the")
    second = list(range(gaps[-1] + 1 + len(middle), gaps[-1] + 1 + len(middle) + 3))
    tokens = ids_before + [0, 0] + middle + [0, 0, 0]
    assert filled.text.startswith("the") and "sat on the" in filled.text and len(filled.gaps) == 2
    samples = lm.fill("the [___] sat on the [___:3]", num_samples=3, temperature=0)
    assert len(samples) == 3 and len({s.text for s in samples}) == 1  # greedy: the same every time
    greedy = samples[0]
    chosen = list(tokens)
    for position in gaps + second:  # left to right: each gap token is the argmax given S and earlier ones
        targets = [p for p in gaps + second if p <= position]
        source = [p for p in range(len(tokens)) if p not in gaps + second]
        chosen[position] = int(next_token_log_probs(lm.model, chosen, source, targets).argmax())
    source = [p for p in range(len(tokens)) if p not in gaps + second]
    expected_log_prob = float(score(lm.model, np.asarray(chosen), source, gaps + second))
    assert greedy.gaps == [tokenizer.decode([chosen[p] for p in gaps]), tokenizer.decode([chosen[p] for p in second])]
    assert greedy.log_prob == pytest.approx(expected_log_prob, abs=1e-4)
    speculative = lm.fill("the [___] sat on the [___:3]", strategy="speculative", draft=3, temperature=0)
    assert speculative.gaps == greedy.gaps and speculative.log_prob == pytest.approx(expected_log_prob, abs=1e-4)


def test_score_is_the_sum_of_left_to_right_full_pass_terms(exported):
    directory, tokenizer = exported
    lm = TextModel.load(directory / "model")
    text, given = "the dog lay under the rug", "a big cat"
    ids = tokenizer.encode(text)
    total = sum(float(next_token_log_probs(lm.model, ids, [], list(range(k + 1)))[ids[k]]) for k in range(len(ids)))
    assert lm.score(text) == pytest.approx(total, abs=1e-4)
    context = tokenizer.encode(given)
    both = context + ids
    source = list(range(len(context)))
    conditional = sum(float(next_token_log_probs(lm.model, both, source, list(range(len(context), k + 1)))[both[k]])
                      for k in range(len(context), len(both)))
    assert lm.score(text, given=given) == pytest.approx(conditional, abs=1e-4)


def test_bad_inputs_name_the_problem(exported):
    directory, _ = exported
    with pytest.raises(UserError, match="carries no tokenizer"):
        TextModel.load(directory / "bare")
    lm = TextModel.load(directory / "model")
    with pytest.raises(UserError, match="nothing to complete"):
        lm.fill("no gaps here")
    with pytest.raises(UserError, match="max_new_tokens"):
        lm.generate("the", max_new_tokens=0)
    with pytest.raises(UserError, match="empty"):
        lm.score("")
