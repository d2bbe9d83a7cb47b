"""Validation errors raised when a process is constructed; TFF's names, TypeError subclasses."""


class TemplateInitFnParamNotEmptyError(TypeError):
  """`initialize` takes a parameter; it must take none."""


class TemplateNextFnNumArgsError(TypeError):
  """`next` takes the wrong number of arguments for its template."""


class TemplateStateNotAssignableError(TypeError):
  """The state `next` returns differs (tree, shape or dtype) from the state `initialize` makes."""


class TemplateNotMeasuredProcessOutputError(TypeError):
  """A measured process's `next` does not return a `MeasuredProcessOutput`."""


class LearningProcessOutputError(TypeError):
  """A learning process's `next` does not return a `LearningProcessOutput`."""


class LearningProcessSequenceTypeError(TypeError):
  """A learning process's client data is not a `ClientBatches` with client and step axes."""


class LearningProcessPlacementError(TypeError):
  """Server values carry a client axis, or client values lack one."""
