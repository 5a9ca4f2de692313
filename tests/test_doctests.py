"""The examples in the docstrings of every engine and models module run, and hold."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import engine
import models

MODULES = sorted(
    [
        f"{package.__name__}.{info.name}"
        for package in (engine, models)
        for info in pkgutil.iter_modules(package.__path__)
    ]
    # streams is glue around the Faust app (imported, it builds one); this one is not.
    + ["streams.feedback_process", "streams.learner_process"]
)
# Modules whose examples must exist (a docstring edit that drops them all fails here).
WITH_EXAMPLES = {
    "engine.messages",
    "engine.store",
    "engine.features",
    "engine.impressions",
    "engine.feedback",
    "engine.ranking",
    "engine.experiments",
    "engine.item_similarity",
    "engine.diversity",
    "models.online_ctr",
    "models.online_learner",
    "models.deep_ctr",
    "models.deep_trainer",
    "models.training_window",
    "streams.learner_process",
    "models.registry",
}


def test_modules_are_found() -> None:
    assert set(MODULES) >= WITH_EXAMPLES | {"engine.redis_store"}


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"{name} has no examples"
