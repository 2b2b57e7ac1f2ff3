"""The arena's rating math: the battles table, FastChat's clean-battle reader, and leaderboard
ratings (online Elo, Bradley-Terry, bootstrap intervals, ranks, style control) as pure functions.
Nothing here touches the bus; callers run the fits off the event loop."""
