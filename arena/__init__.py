"""The arena: its rating math (the battles table, FastChat's clean-battle reader, online Elo,
Bradley-Terry, bootstrap intervals, ranks, style control) as pure functions that never touch the
bus, the leaderboard's results and plots, and its side of the bus (`feed`: replay, follow,
snapshots; `transfer`: clean-battle files in and out of ARENA). Fits run off the event loop."""
