"""The run configuration: YAML files with ``base:`` includes and dotted overrides, validated once at start into a
frozen pydantic ``RunConfig`` whose errors are one line naming the key."""
