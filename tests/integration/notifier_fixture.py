"""A notifier for the tests: appends what it was called with to a file."""

import json

from airflow.sdk import BaseNotifier


class RecordingNotifier(BaseNotifier):
    template_fields = ("path",)

    def __init__(self, *, path: str):
        super().__init__()
        self.path = path

    def notify(self, context):
        ti = context.get("ti") or context.get("task_instance")
        with open(self.path, "a") as f:
            f.write(json.dumps({"dag_id": ti.dag_id, "task_id": ti.task_id,
                                "exception": str(context.get("exception"))}) + "\n")
