from ovis2.engine.detokenizer import IncrementalDetokenizer
from ovis2.engine.sampling_params import SamplingParams


def stream(tokenizer, text, **params):
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(**params))
    deltas, stop = [], None
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        stop = detok.add_token(token_id)
        if stop:
            break
        deltas.append(detok.take_delta(finished=False))
    deltas.append(detok.take_delta(finished=True))
    return deltas, detok.text, stop


def test_multibyte_characters_never_split(tokenizer):
    text = "héllo 世界 🎉 naïve ok"
    deltas, full, _ = stream(tokenizer, text)
    assert "".join(deltas) == full == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_cuts_the_text_exactly(tokenizer):
    deltas, full, stop = stream(tokenizer, "one two three four", stop=["three"])
    assert stop == "three" and full == "one two " and "".join(deltas) == "one two "


def test_stop_string_can_be_kept(tokenizer):
    _, full, _ = stream(tokenizer, "one two three four", stop=["three"], include_stop_str_in_output=True)
    assert full == "one two three"


def test_partial_stop_match_is_held_back(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["END!"]))
    for token_id in tokenizer.encode("abc EN", add_special_tokens=False):
        detok.add_token(token_id)
    assert detok.take_delta(finished=False) == "abc "  # "EN" might start "END!"
    for token_id in tokenizer.encode("X", add_special_tokens=False):
        detok.add_token(token_id)
    assert detok.take_delta(finished=False) == "ENX"


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("hi<|im_end|>", add_special_tokens=False)
    kept = IncrementalDetokenizer(tokenizer, SamplingParams(skip_special_tokens=False))
    skipped = IncrementalDetokenizer(tokenizer, SamplingParams())
    for token_id in ids:
        kept.add_token(token_id)
        skipped.add_token(token_id)
    assert kept.text == "hi<|im_end|>" and skipped.text == "hi"


def test_stop_strings_are_only_searched_when_asked(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["two"]))
    ids = tokenizer.encode("one two three", add_special_tokens=False)
    assert [detok.add_token(t, check_stops=False) for t in ids] == [None] * len(ids)
    assert detok.text == "one two three"


def test_a_short_stop_completed_earlier_is_not_found_again_later(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["ab", "xyzxyz"]))
    ids = tokenizer.encode("ab", add_special_tokens=False)
    for token_id in ids:
        detok.add_token(token_id, check_stops=False)  # min_tokens not out yet
    assert detok.add_token(tokenizer.encode(" c", add_special_tokens=False)[0]) is None
    assert detok.text == "ab c"
