"""The one YAML loader envctl uses: PyYAML's safe subset, bounded before anything is built.

Why: ``yaml.safe_load`` refuses arbitrary Python objects but not arbitrary *cost*. A 380-byte
"billion laughs" document (nine levels of nine aliases) is composed in microseconds into a graph
whose expansion has 9⁹ leaves; the first thing that walks it (a ``repr`` in an error message, a
validation loop) runs for minutes and takes gigabytes. A document nested 20,000 deep makes the
recursive composer raise ``RecursionError``, and a 5,000-digit plain scalar makes the int
constructor raise ``ValueError`` — neither of which callers expect from a YAML parser.

So the limits are enforced while the node graph is *composed*, before any Python object exists:

- ``max_depth`` levels of nesting (a count, checked before descending: never a RecursionError);
- ``max_nodes`` nodes *as expanded*: an alias costs the full size of the subtree it names, so an
  alias bomb is refused after at most ``max_nodes`` units of work, while an ordinary alias still
  works; an alias to a node that is still being composed (a cycle) is refused outright;
- any exception a constructor raises on a well-formed but absurd value (``!!int 0x``,
  ``2020-13-45``, ``!!timestamp x``, a 5,000-digit integer) becomes a YAML error.

Every refusal is a :class:`yaml.MarkedYAMLError` (``problem`` + ``problem_mark``), so callers
report it exactly as they report a syntax error: one line naming the line number.

Speed: PyYAML's pure-Python scanner and parser take ~0.6 s for a 60 KB spec (``"k: v\n" *
12000``), all of it holding the GIL — a requester with a few dozen connections could starve
every other daemon thread. When libyaml is available (``yaml.__with_libyaml__``) the *events*
come from its C parser (~10x faster), while composition stays in Python so the bounds above are
still counted node by node; libyaml's own composer (``CSafeLoader``) would skip them.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml import YAMLError
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import Node
from yaml.resolver import Resolver

__all__ = ["BoundedLoader", "LimitExceeded", "YAMLError", "safe_load"]

MAX_DEPTH = 64  # an environment.yml needs 4 levels, the daemon's config 3
MAX_NODES = 100_000  # far above any real document (a 64 KiB spec holds ~30,000 nodes at most)
MAX_PROBLEM = 160  # characters of a parser's problem text kept in the error
_NULLS = frozenset({"", "~", "null", "Null", "NULL"})  # plain scalars that stay null as text
_STR = "tag:yaml.org,2002:str"
# libyaml's scanner refuses flow nesting past 1,000 levels itself, scanning ahead of our composer.
_LIBYAML_DEPTH = "exceeded maximum nesting depth"


class LimitExceeded(yaml.MarkedYAMLError):
    """The document is well-formed YAML but exceeds a size, depth or value limit."""


class _Bounds(Composer, SafeConstructor):
    """The limits, as overrides of the composer and constructor; the event source (pure
    Python or libyaml) is whatever class follows in the MRO."""

    max_depth = MAX_DEPTH
    max_nodes = MAX_NODES
    text_scalars = False  # see ``safe_load``

    def resolve(self, kind: type[Node], value: str, implicit: tuple[bool, bool]) -> str:
        if self.text_scalars and kind is yaml.ScalarNode and implicit[0] and \
                value not in _NULLS:
            return _STR
        return str(super().resolve(kind, value, implicit))  # type: ignore[misc]

    def _start_bounds(self) -> None:
        self._depth = 0
        self._expanded = 0
        self._anchored_size: dict[int, int] = {}  # id(anchored node) -> its expanded size

    def _refuse(self, problem: str, mark: Any) -> LimitExceeded:
        return LimitExceeded(problem=problem, problem_mark=mark)

    def _spend(self, nodes: int, mark: Any) -> None:
        self._expanded += nodes
        if self._expanded > self.max_nodes:
            raise self._refuse(f"the document expands to more than {self.max_nodes} nodes "
                               "(aliases count as the nodes they repeat)", mark)

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:
                size = self._anchored_size.get(id(target))
                if size is None:
                    raise self._refuse(f"alias *{event.anchor} refers to a node that contains "
                                       "it (a cycle)", event.start_mark)
                self._spend(size, event.start_mark)
            return super().compose_node(parent, index)
        if self._depth >= self.max_depth:
            raise self._refuse(f"nested more than {self.max_depth} levels deep",
                               event.start_mark)
        before = self._expanded
        self._spend(1, event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if getattr(event, "anchor", None) is not None:
            self._anchored_size[id(node)] = self._expanded - before
        return node

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        """Constructor errors that are not YAML errors become YAML errors with a line.

        PyYAML's constructors trust a tag's value to have the tag's shape: ``!!int 0x`` and
        ``2020-13-45`` raise ValueError, ``!!timestamp x`` an AttributeError (its regex did
        not match). Whatever they raise, the document is refused, never the daemon's request.
        """
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # noqa: BLE001 — see the docstring
            raise self._refuse(f"cannot read the value: {str(exc)[:120]}",
                               node.start_mark) from None


class BoundedLoader(_Bounds, yaml.SafeLoader):
    """``yaml.SafeLoader`` (pure Python) that counts depth and expanded nodes while composing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._start_bounds()


if yaml.__with_libyaml__:
    class BoundedCLoader(_Bounds, yaml.cyaml.CParser, Resolver):
        """The same bounds on events from libyaml's parser: ``_Bounds`` (a Python
        ``Composer``) precedes ``CParser`` in the MRO, so ``get_single_node`` and
        ``compose_node`` are the Python, counting ones; only scanning and parsing are C."""

        def __init__(self, stream: str) -> None:
            yaml.cyaml.CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self._start_bounds()

    _Loader: type[_Bounds] = BoundedCLoader
else:  # pragma: no cover — libyaml is a dependency of the packaged builds
    _Loader = BoundedLoader


def safe_load(text: str, text_scalars: bool = False) -> Any:
    """``yaml.safe_load`` with the limits above; every failure is a ``yaml.YAMLError``.
    ``text_scalars``: a plain scalar is the text written, not YAML 1.1's reading of it
    (``0022`` stays ``0022``, not 18; ``no`` stays ``no``, not False; ``1.10``, ``8:30``
    likewise); an empty one, ``~`` and ``null`` are still null, a tag still says its type.

    PyYAML quotes the document in its problems (``found undefined alias 'a111...'``): the
    quote is cut to :data:`MAX_PROBLEM` characters, since messages go to logs and peers.
    """
    try:
        loader = _Loader(text)
    except UnicodeEncodeError as exc:  # libyaml takes UTF-8: a lone surrogate cannot be sent
        line = text.count("\n", 0, exc.start)
        mark = yaml.Mark("<unicode string>", exc.start, line,
                         exc.start - (text.rfind("\n", 0, exc.start) + 1), None, None)
        raise yaml.MarkedYAMLError(problem="special characters are not allowed",
                                   problem_mark=mark) from None
    loader.text_scalars = text_scalars
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        if not isinstance(exc, LimitExceeded) and exc.problem == _LIBYAML_DEPTH:
            raise LimitExceeded(problem=f"nested more than {MAX_DEPTH} levels deep",
                                problem_mark=exc.problem_mark) from None
        for attr in ("problem", "context"):
            value = getattr(exc, attr, None)
            if isinstance(value, str) and len(value) > MAX_PROBLEM:
                setattr(exc, attr, value[:MAX_PROBLEM] + "...")
        raise
    finally:
        loader.dispose()
