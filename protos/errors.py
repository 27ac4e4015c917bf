"""The root of every cdfkd exception.

It lives in ``cdfkd.protos`` because that package is the bottom of the import DAG
(protos <- teacher_node <- student_node <- coordinator), so every package can derive from it.
"""

from __future__ import annotations


class CdfkdError(Exception):
    """Base class of all errors raised on purpose by cdfkd.

    Messages say what was wrong and what to do about it. Subclasses that take extra
    constructor arguments define ``__reduce__`` so they survive pickling across Ray.
    """
