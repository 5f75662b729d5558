"""Defenses behind one registry: `cgd.defenses.get("cgd")`, `cgd.defenses.list()`.

Every defense takes the (possibly poisoned) training set and the suspicious model trained on it and returns a
`DefenseResult`: the defended model, the data split it made (if any) and its wall seconds per stage. `cgd.defend`
runs CGD on a model of the user's own.
"""

from .base import DEFENSES, Context, Defense, DefenseResult, get, list  # noqa: A004
from .guided import CGD, defend  # (importing registers "cgd")
from .pruning import EP, FP, FPSC  # (registers "ep", "fp", "fp-sc")
from .abl import ABL  # (registers "abl")
from .ibau import IBAU, IBAUSC  # (registers "i-bau", "i-bau-sc")
from .mcr import MCR, MCRSC  # (registers "mcr", "mcr-sc")
from .reback import ReBack  # (registers "reback")
from .anp import ANP, ANPSC  # (registers "anp", "anp-sc")
from .pipd import PIPD  # (registers "pipd")
from .dbr import DBR  # (registers "d-br")
from .asd import ASD, ASDSC  # (registers "asd", "asd-sc")
from .dbd import DBD  # (registers "dbd")
from .mspc import MSPC  # (registers "mspc")

__all__ = ["ABL", "ANP", "ANPSC", "ASD", "ASDSC", "CGD", "DBD", "DBR", "DEFENSES", "EP", "FP", "FPSC", "IBAU", "IBAUSC", "MCR", "MCRSC", "MSPC", "PIPD",
           "ReBack", "Context", "Defense", "DefenseResult", "defend", "get", "list"]
