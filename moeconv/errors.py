"""Typed errors. Every message is one line that names the file, key or rule and says what is wrong.

The CLI turns any MoeconvError into that one line on stderr and exit code 1 (see cli.py).
"""


class MoeconvError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback."""


class OptionError(MoeconvError):
    """A command-line option's value is malformed or out of its bounds (the message names the option)."""


class CheckpointError(MoeconvError):
    """A checkpoint file or index claims something that is not true or not safe."""


class RecipeError(MoeconvError):
    """A recipe (preset or user TOML) is malformed: the message names the file, rule and field."""


class OpError(MoeconvError):
    """An op was given inputs or parameters it cannot work with (the plan adds rule and key)."""


class FormatError(MoeconvError):
    """A checkpoint's quantization_config declares a scheme the format's module does not support."""


class PlanError(MoeconvError):
    """The conversion cannot be planned: a group misses a member, two rules write one key, ..."""


class WriteError(MoeconvError):
    """Writing the output failed (disk full, file-size limit, output folder refused)."""


class InternalError(MoeconvError):
    """A produced chunk disagrees with the plan: a bug in moeconv, reported naming rule and key."""


class HubError(MoeconvError):
    """A hub repo cannot be used: not found, needs a token, offline and not cached, only pickled weights."""


class VerifyError(MoeconvError):
    """A converted folder does not match its report (or, with --against, its source and recipes)."""


class ClusterError(MoeconvError):
    """--ray: Ray is not installed, the cluster cannot be reached, or a task failed on its node."""
