"""The exceptions the CLI turns into exit codes; the lowest layer, imported by every other."""


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, exit code 2."""


class StudyInterrupted(Exception):
    """A study stopped before all its trials finished (Ctrl-C); its state is saved: exit 130."""
