"""core.registry: register, list, look up, and one error text that lists the valid names."""

import pytest

from facefuse.core.errors import FacefuseError
from facefuse.core.registry import Registry, UnknownNameError


def test_register_list_and_get():
    reg = Registry("widget")

    @reg.register("b")
    def make_b():
        return "b"

    reg.register("a", make_b)
    assert reg.names() == ["b", "a"] and list(reg) == ["b", "a"] and len(reg) == 2
    assert reg.get("a") is make_b and "b" in reg and "c" not in reg


def test_unknown_name_lists_the_valid_ones():
    reg = Registry("pair loss")
    reg.register("triplet", object)
    reg.register("supcon", int)
    with pytest.raises(UnknownNameError) as info:
        reg.get("tripplet")
    assert str(info.value) == "unknown pair loss 'tripplet'; valid: triplet, supcon"
    assert isinstance(info.value, FacefuseError) and isinstance(info.value, ValueError)
    with pytest.raises(UnknownNameError):
        reg.get(["not", "hashable"])


def test_duplicate_and_bad_names_are_refused():
    reg = Registry("neck")
    reg.register("gdc", int)
    reg.register("gdc", int)  # the same object again (a module imported twice) is fine
    with pytest.raises(ValueError, match="already registered"):
        reg.register("gdc", float)
    with pytest.raises(ValueError, match="letters, digits"):
        reg.register("bad name", int)
