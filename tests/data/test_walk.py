"""The walk's ignore layers, asked directly: the config's patterns over the .gitignore files over the defaults."""

import pathspec

from codetune.data.walk import IgnoreRules


def gitignore(base: str, *lines: str) -> tuple[str, pathspec.GitIgnoreSpec]:
    return base, pathspec.GitIgnoreSpec.from_lines(lines)


def test_the_first_layer_with_a_matching_pattern_decides():
    rules = IgnoreRules.of(["!vendor/", "*.gen.rs"])
    assert not rules.is_ignored("vendor", True, ())  # the config re-includes a default
    assert rules.is_ignored("target", True, ()) and not rules.is_ignored("target", False, ())  # dirs only
    assert rules.is_ignored("src/a.gen.rs", False, (gitignore("", "!*.gen.rs"),))  # config over .gitignore
    assert not rules.is_ignored("build", True, (gitignore("", "!build/"),))  # .gitignore over the defaults


def test_the_closest_gitignore_wins_and_matches_paths_relative_to_its_own_directory():
    rules = IgnoreRules.of([])
    layers = (gitignore("", "*.log"), gitignore("sub/", "!keep.log", "/local.rs"))
    assert rules.is_ignored("a.log", False, layers)
    assert not rules.is_ignored("sub/keep.log", False, layers)
    assert rules.is_ignored("sub/local.rs", False, layers) and not rules.is_ignored("local.rs", False, layers)
