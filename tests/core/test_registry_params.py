"""Parameters are declared once: a registry entry's ``Param`` list and its factory's signature
cannot disagree (checked when the entry is registered), every registry of the package passes that
check, and ``asymvlm-merge``'s method flags are generated from the merge methods' registry."""

import importlib
import inspect
import pathlib
import re
from typing import Literal

import pytest

from asymvlm.errors import ConfigError
from asymvlm.registry import Entry, Param, Registry, check_signature

ROOT = pathlib.Path(__file__).resolve().parents[2]
FOLDERS = {"asymvlm": "asymvlm", "federated": "asymvlm.federated", "merging": "asymvlm.merging",
           "training": "asymvlm.training", "eval": "asymvlm.eval"}  # fmt: skip


def package_registries() -> dict[str, str]:
    """Every ``NAME = Registry(...)`` of the five source folders (what ``grep -rn "Registry("`` finds):
    ``"module.NAME" -> module``, the module under its installed name."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            names = re.findall(r"^([A-Z_]+) = Registry\(", path.read_text(), flags=re.M)
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            module = ".".join((package, *(parts[:-1] if parts[-1] == "__init__" else parts)))
            out.update({f"{module}.{name}": module for name in names})
    return out


REGISTRIES = package_registries()


def registry(qualname):
    module = REGISTRIES[qualname]
    return getattr(importlib.import_module(module), qualname[len(module) + 1 :])


def register(factory, *params, name="hello"):
    reg = Registry("greeting")
    reg.register(name, params=params, help="Say hello.")(factory)
    return reg


TIMES = Param("times", int, 1, "How often.")


# ----------------------------------------------------------------------------------------------
# a disagreement fails at registration, naming the entry and the parameter
# ----------------------------------------------------------------------------------------------
def test_a_default_that_differs_fails_with_both_values():
    def hello(times=2):
        return "hello " * times

    with pytest.raises(ConfigError) as err:
        register(hello, TIMES)
    message = str(err.value)
    assert "greeting 'hello'" in message and "'times'" in message, message
    assert "default 1 in its Param but 2" in message, message


def test_a_default_of_another_type_fails():
    with pytest.raises(ConfigError, match=r"'scale' has default 1.0 in its Param but 1 in"):
        register(lambda scale=1: scale, Param("scale", float, 1.0, "Scale."))


def test_a_factory_parameter_without_a_param_fails():
    def hello(times, loud=False):
        return ("HELLO " if loud else "hello ") * times

    with pytest.raises(ConfigError, match=r"greeting 'hello': parameter 'loud' of its factory .* is not declared"):
        register(hello, TIMES)


def test_a_param_the_factory_does_not_take_fails():
    with pytest.raises(ConfigError, match=r"greeting 'hello': Param 'times' is not a keyword parameter"):
        register(lambda: "hello", TIMES)


def test_a_positional_only_parameter_cannot_be_passed():
    def hello(times, /):
        return "hello " * times

    with pytest.raises(ConfigError, match="parameter 'times' of its factory"):
        register(hello, TIMES)


def test_an_annotation_that_does_not_admit_the_type_fails():
    def hello(times: str):
        return times

    with pytest.raises(ConfigError, match=r"greeting 'hello': parameter 'times': the Param's type int is not admitted"):
        register(hello, TIMES)

    def pick(mode: Literal["a", "b"] = "a"):
        return mode

    with pytest.raises(ConfigError, match=r"parameter 'mode': the Param's choices \['c'\] are not admitted"):
        register(pick, Param("mode", Literal["a", "b", "c"], "a", "Mode."))


def test_a_name_or_parameter_registered_twice_fails():
    reg = register(lambda times: times, TIMES)
    with pytest.raises(ConfigError, match="greeting 'hello' is already registered"):
        reg.register("hello", params=[TIMES])(lambda times: times)
    with pytest.raises(ConfigError, match="declares a parameter twice"):
        reg.register("again", params=[TIMES, TIMES])(lambda times: times)


def test_a_failed_registration_registers_nothing():
    reg = Registry("greeting")
    with pytest.raises(ConfigError):
        reg.register("hello", params=[TIMES])(lambda times=3: times)
    assert "hello" not in reg and len(reg) == 0


# ----------------------------------------------------------------------------------------------
# what agrees is accepted
# ----------------------------------------------------------------------------------------------
def test_agreeing_signatures_are_accepted():
    def hello(times: int = 1, *, mode: Literal["a", "b"] = "a", scale: float | None = None, path: "str | None" = None):
        return times, mode, scale, path

    params = (
        TIMES,
        Param("mode", Literal["a", "b"], "a", "Mode."),
        Param("scale", float, None, "Scale."),
        Param("path", str, None, "Path."),
    )
    reg = register(hello, *params)
    assert reg.build("hello", times=2, scale=3) == (2, "a", 3.0, None)
    # no defaults in the signature: the registry passes every declared option, so nothing can disagree
    register(lambda times, mode: (times, mode), TIMES, Param("mode", str, "a", "Mode."))

    def widen(n: float, mode: str):  # an int where a float is annotated (PEP 484), str choices where str is
        return n, mode

    check_signature("greeting", Entry("x", widen, (Param("n", int, 1, "n."), Param("mode", Literal["a"], "a", "m."))))
    # **options takes every declared option; a builtin without a readable signature is not checked
    register(lambda **options: options, TIMES)
    register(dict, TIMES)


# ----------------------------------------------------------------------------------------------
# every registry of the package agrees (it imported, so it registered; checked again here)
# ----------------------------------------------------------------------------------------------
def test_the_registries_of_the_package_are_found():
    expected = {
        "FAMILY_REGISTRY", "VMF_NORMALIZER_REGISTRY", "ABSTAIN_REGISTRY", "DATASET_SPEC_REGISTRY",
        "PARTITIONER_REGISTRY", "RECIPES", "METHODS", "SELECTION_CRITERIA", "LORA_MODES", "ATTACKS",
    }  # fmt: skip
    assert expected <= {q.rsplit(".", 1)[1] for q in REGISTRIES}, REGISTRIES


@pytest.mark.parametrize("qualname", list(REGISTRIES))
def test_every_registry_of_the_package_agrees_with_its_factories(qualname):
    reg = registry(qualname)
    assert isinstance(reg, Registry) and len(reg) > 0
    for entry in reg.values():
        check_signature(reg.kind, entry)
        signature = None
        try:
            signature = inspect.signature(entry.factory)
        except (TypeError, ValueError):
            assert entry.factory is dict, entry  # only dict (returns the options) has no signature
            continue
        keywords = {n for n, a in signature.parameters.items() if a.kind in (a.POSITIONAL_OR_KEYWORD, a.KEYWORD_ONLY)}
        takes_any = any(a.kind is a.VAR_KEYWORD for a in signature.parameters.values())
        assert keywords == set(entry.param_names) or (takes_any and keywords <= set(entry.param_names)), entry.name
    reg.options()  # one type per option name across the entries


# ----------------------------------------------------------------------------------------------
# asymvlm-merge's method flags come from the registry
# ----------------------------------------------------------------------------------------------
def test_merge_method_flags_are_generated_from_the_registry():
    from asymvlm.merging.cli import SPEC, build_parser
    from asymvlm.merging.methods import METHODS

    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    for name, (param, methods) in METHODS.options().items():
        assert name in SPEC and f"--{name}" in parser._option_string_actions, name
        action = actions[name]
        if param.choices is not None:
            assert tuple(action.choices) == param.choices, name
        elif param.type is bool:
            assert action.const is True and action.nargs == 0, name
        else:
            assert action.type is param.type, name
        assert param.help in action.help, name
        if len(methods) == len(METHODS):  # shared by every method with one default: lam
            assert action.default == param.default, name
        else:  # each method's own default, named in the help
            assert action.default is None and all(m in action.help for m in methods), name
    assert actions["lam"].default == 1.0
    # and the parsed values reach the method's options as the registry types them
    args = parser.parse_args(["--method", "dare_ties", "--p", "0.5", "--seed", "3", "--sign_weighted"])
    assert (args.p, args.seed, args.sign_weighted, args.density) == (0.5, 3, True, None)
