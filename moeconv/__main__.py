from moeconv.cli import main

main()
