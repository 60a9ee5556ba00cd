import pytest
import torch

from shared.models import loading as models, text


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("builtin:tiny", parts=("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))


def test_token_windows_by_hand():
    w = text.token_windows(list(range(1, 161)), bos=900, eos=901, pad=0)
    assert len(w) == 3 and all(len(x) == 77 for x in w)
    assert w[0] == [900] + list(range(1, 76)) + [901]
    assert w[2] == [900] + list(range(151, 161)) + [901] + [0] * 65
    assert text.token_windows([], 900, 901, 0) == [[900, 901] + [0] * 75]
    assert text.token_windows(list(range(200)), 900, 901, 0, max_windows=1)[0][-1] == 901


def test_long_caption_is_windowed_and_each_window_encoded_alone(tiny):
    caption = ", ".join(f"tag{i}" for i in range(60))  # well over 75 tokens
    hidden, pooled = text.encode_caption(tiny, caption)
    n = len(text.tokenize(tiny.tokenizer, caption))
    assert n >= 2 and hidden.shape == (n * 77, 80) and pooled.shape == (48,)
    first_only, pooled_1 = text.encode_caption(tiny, caption, max_windows=1)
    assert first_only.shape == (77, 80)
    assert torch.allclose(hidden[:77], first_only, atol=1e-6)   # window 1 does not see window 2
    assert torch.allclose(pooled, pooled_1, atol=1e-6)           # pooled comes from the first window


def test_penultimate_layer_and_channel_order(tiny):
    hidden, _ = text.encode_caption(tiny, "a red circle")
    ids1 = text.tokenize(tiny.tokenizer, "a red circle")
    with torch.no_grad():
        out1 = tiny.text_encoder(torch.tensor(ids1), output_hidden_states=True)
    assert torch.allclose(hidden[:, :32], out1.hidden_states[-2][0], atol=1e-6)
    assert not torch.allclose(hidden[:, :32], out1.last_hidden_state[0], atol=1e-3)


def test_time_ids_heights_first():
    assert text.time_ids((768, 1024), (16, 0), (1024, 1024)) == [768, 1024, 16, 0, 1024, 1024]
