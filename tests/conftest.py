"""Fixtures shared by the end-to-end tests."""

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tiny three-speaker play: a few hundred 32-token blocks, enough to train for a few steps."""
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    lines = [f"{['ROMEO', 'JULIET', 'NURSE'][i % 3]}:\nO gentle night, thou art the {['moon', 'sun', 'star'][i % 3]} "
             f"of my heart number {i % 7}.\n" for i in range(400)]
    path.write_text("\n".join(lines))
    return path
