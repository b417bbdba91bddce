"""Analysis and rewrite passes over dit-opt's FX IR.

One pass per module, one public function per pass: ``(graph, ...) -> PassResult``.
"""

from passes.infra import PassResult

__all__ = ["PassResult"]
