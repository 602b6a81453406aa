"""The titles of the argument groups whose flags' environment variables are named differently
(stream/cli.py names every flag's variable; these groups are the exceptions it looks for).

Its own module so that the modules defining such groups (stream/kafka_config.py, `kvrec
models`) and the command line that reads them import it, not each other.
"""

# the argument group whose flags every Kafka command shares: their variables are `KVREC_<FLAG>`
SHARED_GROUP = "kafka connection"
# the argument group of the flags every action of a command shares (`kvrec models list|promote`):
# their variables are the command's, `KVREC_<COMMAND>_<FLAG>`, not `KVREC_<COMMAND>_<ACTION>_<FLAG>`
COMMAND_GROUP = "shared by every action"
