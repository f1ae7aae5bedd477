"""``python -m apr_training.cli.bag_player BAG``: play a ROS 2 bag into live topics (like ``ros2 bag play``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..bags.player import BagPlayer, BagPlayerError
from ..ros_harness import RosHarness, ros_environment

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m apr_training.cli.bag_player",
        description="Play a ROS 2 bag (sqlite3 or mcap, read with rosbags) into live topics at the recorded rate, "
        "like `ros2 bag play`, with LOCALHOST-only discovery.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("bag", help="rosbag2 directory or .mcap file")
    p.add_argument("--topics", nargs="+", help="bag topics to play (default: all)")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor")
    p.add_argument("--start-offset", type=float, default=0.0, help="skip this many seconds of the bag")
    p.add_argument("--duration", type=float, help="play at most this many seconds of the bag")
    p.add_argument("--loop", action="store_true", help="replay until interrupted")
    p.add_argument("--clock", action="store_true", help="publish /clock on the bag's timeline (use_sim_time)")
    p.add_argument("--restamp", action="store_true", help="stamp header-bearing messages with the send time")
    p.add_argument("--remap", nargs="+", default=[], metavar="FROM:=TO", help="topic remappings")
    p.add_argument("--wait-subscribers", type=float, default=0.0, help="wait up to this long for a subscriber first")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Play a bag from the command line; returns the exit status."""
    args = _build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    remap = {}
    for item in args.remap:
        if ":=" not in item:
            print(f"bag_player: error: remapping {item!r} is not of the form FROM:=TO", file=sys.stderr)
            return 2
        src, dst = item.split(":=", 1)
        remap[src] = dst
    with ros_environment(lambda text: print(f"bag_player: set {text}", file=sys.stderr)):
        session = RosHarness(name="apr_bag_player")
        try:
            player = BagPlayer(
                args.bag,
                session.node,
                args.topics,
                rate=args.rate,
                start_offset_s=args.start_offset,
                duration_s=args.duration,
                loop=args.loop,
                clock=args.clock,
                restamp=args.restamp,
                remap=remap,
            )
            if args.wait_subscribers > 0:
                player.wait_for_subscribers(timeout=args.wait_subscribers)
            result = player.play()
            print(f"bag_player: published {result.count()} messages in {result.wall_s:.2f} s ({result.loops} pass(es))")
            return 0
        except BagPlayerError as exc:
            print(f"bag_player: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        finally:
            session.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
