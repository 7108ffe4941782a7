"""Unit tests of the engine's text logic: streaming token bytes to text, and chat rendering."""

from __future__ import annotations

import pytest

from inferencecenter.actors.engine.chat import ChatRenderer
from inferencecenter.actors.engine.text import TextStream


def feed(stream: TextStream, pieces: list[bytes]) -> tuple[list[str], bool]:
    sent: list[str] = []
    stopped = False
    for piece in pieces:
        text, stopped = stream.push(piece)
        sent.append(text)
        if stopped:
            break
    return sent, stopped


# ---- TextStream ---------------------------------------------------------------------------


def test_plain_pieces_pass_through_at_once() -> None:
    sent, stopped = feed(TextStream(), [b"Hello", b", ", b"world"])
    assert sent == ["Hello", ", ", "world"]
    assert not stopped


def test_two_byte_character_split_over_pieces_is_held_until_complete() -> None:
    e_acute = "é".encode()
    sent, _ = feed(TextStream(), [b"caf" + e_acute[:1], e_acute[1:] + b"!"])
    assert sent == ["caf", "é!"]


def test_emoji_split_byte_by_byte() -> None:
    emoji = "😀".encode()
    assert len(emoji) == 4
    stream = TextStream()
    sent, _ = feed(stream, [bytes([b]) for b in emoji])
    assert sent == ["", "", "", "😀"]
    assert stream.flush() == ""


def test_stop_string_split_over_pieces_is_never_sent() -> None:
    stream = TextStream(stop=["<END>"])
    sent, stopped = feed(stream, [b"answer <", b"EN", b"D> trailing"])
    assert stopped
    assert "".join(sent) == "answer "
    assert all("<" not in text for text in sent)


def test_stop_string_inside_one_piece_cuts_there() -> None:
    sent, stopped = feed(TextStream(stop=["\n\n"]), [b"one", b" line\n\nnext"])
    assert sent == ["one", " line"]
    assert stopped


def test_earliest_of_several_stop_strings_wins() -> None:
    sent, stopped = feed(TextStream(stop=["world", "lo"]), [b"hello world"])
    assert sent == ["hel"]
    assert stopped


def test_held_back_prefix_is_released_when_it_stops_matching() -> None:
    stream = TextStream(stop=["STOP"])
    first, stopped = stream.push(b"go ST")
    assert (first, stopped) == ("go ", False)
    second, stopped = stream.push(b"ILL moving")
    assert (second, stopped) == ("STILL moving", False)


def test_prefix_of_a_stop_string_then_the_stop_string() -> None:
    # "ab" could start "abc"; once "aab" arrives the first "a" is safe to send.
    sent, stopped = feed(TextStream(stop=["abc"]), [b"a", b"ab", b"c"])
    assert sent == ["", "a", ""]
    assert stopped


def test_nothing_is_sent_after_a_stop() -> None:
    stream = TextStream(stop=["."])
    assert stream.push(b"end. more") == ("end", True)
    assert stream.push(b"again") == ("", True)
    assert stream.flush() == ""


def test_flush_releases_a_held_prefix_at_the_end() -> None:
    stream = TextStream(stop=["</answer>"])
    assert stream.push(b"42 </ans") == ("42 ", False)
    assert stream.flush() == "</ans"


def test_flush_replaces_a_character_cut_short_by_the_end() -> None:
    stream = TextStream()
    assert stream.push("é".encode()[:1]) == ("", False)
    assert stream.flush() == "\ufffd"


def test_invalid_bytes_become_replacement_characters() -> None:
    assert TextStream().push(b"a\xffb") == ("a\ufffdb", False)


def test_empty_stop_strings_are_ignored() -> None:
    assert TextStream(stop=[""]).push(b"text") == ("text", False)


def test_stop_string_with_multibyte_characters_split_over_pieces() -> None:
    stop = "»fin«"
    data = ("voilà" + stop).encode()
    sent, stopped = feed(TextStream(stop=[stop]), [data[i : i + 1] for i in range(len(data))])
    assert stopped
    assert "".join(sent) == "voilà"


# ---- ChatRenderer: Gemma fallback ---------------------------------------------------------


def gemma() -> ChatRenderer:
    return ChatRenderer(None, "<bos>", "<eos>")


def test_gemma_first_turn() -> None:
    text = gemma().render([], [{"role": "user", "content": "Hi there"}])
    assert text == "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"


def test_gemma_system_folds_into_the_next_user_turn() -> None:
    text = gemma().render(
        [],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
    )
    assert text == (
        "<start_of_turn>user\nBe brief.\n\nWhy is the sky blue?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gemma_assistant_is_written_as_model() -> None:
    text = gemma().render(
        [],
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"},
        ],
    )
    assert text == (
        "<start_of_turn>user\n2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\n3+3?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gemma_continuation_starts_after_the_models_end_of_turn() -> None:
    history = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    text = gemma().render(history, [{"role": "user", "content": "And 3+3?"}])
    assert text == "\n<start_of_turn>user\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\n"


def test_gemma_system_alone_becomes_a_user_turn() -> None:
    text = gemma().render([], [{"role": "system", "content": "Be brief."}])
    assert text == "<start_of_turn>user\nBe brief.<end_of_turn>\n<start_of_turn>model\n"


# ---- ChatRenderer: Jinja templates --------------------------------------------------------

# The shape of many real templates: BOS first, one block per message, then the prompt.
CHATML = (
    "{{ bos_token }}{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_template_first_turn_without_bos_text() -> None:
    text = ChatRenderer(CHATML, "<s>", "</s>").render([], [{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_template_continuation_is_the_rendering_after_history() -> None:
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = ChatRenderer(CHATML, "<s>", "</s>").render(history, [{"role": "user", "content": "Bye"}])
    assert text == "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"


def test_template_that_rewrites_history_falls_back_to_the_new_turns() -> None:
    # Renders only the last message: history alone is never a prefix of history + new.
    last_only = (
        "{{ messages[-1]['role'] }}: {{ messages[-1]['content'] }}\n"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = ChatRenderer(last_only, "", "").render(history, [{"role": "user", "content": "Bye"}])
    assert text == "user: Bye\n>"


def test_template_raise_exception_is_a_value_error() -> None:
    strict = (
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('first turn must be user') }}{% endif %}x"
    )
    with pytest.raises(ValueError, match="first turn must be user"):
        ChatRenderer(strict, "", "").render([], [{"role": "assistant", "content": "hi"}])


def test_template_syntax_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="chat template"):
        ChatRenderer("{% for m in messages %}", "", "")


def test_template_sandbox_refuses_unsafe_access() -> None:
    unsafe = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ValueError, match="chat template"):
        ChatRenderer(unsafe, "", "").render([], [{"role": "user", "content": "x"}])
