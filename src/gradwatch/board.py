"""`make tensorboard`: TensorBoard's own server, started without the two notes it prints first.

python -m gradwatch.board --logdir outputs --host 127.0.0.1 --port 6006 [any tensorboard flag]

TensorBoard's command line opens with "TensorFlow installation not found - running with reduced
feature set." and a five-line note on its "experimental fast data loading". Neither concerns a
gradwatch user: gradwatch writes its event files with TensorBoard's own writer, and every
dashboard it uses (scalars, histograms, text, HParams) works without TensorFlow; the fast loader
is TensorBoard's default, and it falls back to the Python one by itself where it cannot start.
What is left is the line with the address to open, which leads to the page gradwatch lays out
(`gradwatch.monitor.first_screen`: loss, per-layer gradient norms, update ratios):
"TensorBoard 2.21.0 at http://127.0.0.1:6006/#custom_scalars&_smoothingWeight=0 (Press CTRL+C to
quit)". Errors (a port in use) print as they do from `tensorboard`.
"""

import sys

import absl.logging
import tensorboard.program as program  # the module itself: `from tensorboard import` is a proxy
from absl import app
from tensorboard import default, version
from tensorboard.plugins import base_plugin

from gradwatch.monitor.first_screen import URL_FRAGMENT


class FirstScreenServer(program.WerkzeugServer):
    """TensorBoard's own server; its one line names the page gradwatch lays out."""

    def print_serving_message(self) -> None:
        url = self.get_url() + URL_FRAGMENT
        sys.stderr.write(f"TensorBoard {version.VERSION} at {url} (Press CTRL+C to quit)\n")
        sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    """Run TensorBoard's server with `argv` (default: this command's arguments) as its flags."""
    argv = sys.argv[1:] if argv is None else argv
    # What `tensorboard`'s own start (tensorboard.main_lib.global_init) does, less the notice
    # that TensorFlow is not installed: only warnings and errors from its logger.
    absl.logging.set_verbosity(absl.logging.WARNING)
    program._DATA_SERVER_ADVISORY_MESSAGE = ""  # written only when the fast loader started
    board = program.TensorBoard(
        plugins=default.get_plugins(),
        server_class=program.with_port_scanning(FirstScreenServer),
    )
    try:
        app.run(board.main, argv=["tensorboard", *argv], flags_parser=board.configure)
    except base_plugin.FlagsError as error:  # as `tensorboard` reports a bad flag
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
