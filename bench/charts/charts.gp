set terminal pngcairo size 960,480 font ",10"
set datafile missing "-"
set style data histogram
set style histogram cluster gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid ytics
set key top right
set yrange [0:*]
set xtics nomirror
set output "throughput.png"
set title "Download throughput, median of 3 runs (higher is better)"
set ylabel "MB/s"
plot "throughput.dat" using 2:xtic(1) title "1 stream", "" using 3 title "8 streams"
set output "http.png"
set title "HTTP requests per second, wrk, median of 3 runs (higher is better)"
set ylabel "requests/s"
plot "http.dat" using 2:xtic(1) title "keep-alive", "" using 3 title "new connection per request"
set output "memory.png"
set title "Resident memory per idle visitor connection, at 10000 (lower is better)"
set ylabel "KiB per connection"
plot "memory.dat" using 2:xtic(1) title "public side (proxy)", "" using 3 title "origin side (client)"
set output "rtt.png"
set terminal pngcairo size 960,900 font ",10"
set multiplot layout 3,1
set style data lines
unset xtics
set xtics
set xlabel "seconds"
set ylabel "MB/s"
set key bottom right
set title "One stream, 100 ms round trip"
plot "rtt-100.dat" using 1:2 title "plain TCP through the relay" lw 2, "" using 1:3 title "shroud" lw 2
set title "One stream, 300 ms round trip"
plot "rtt-300.dat" using 1:2 title "plain TCP through the relay" lw 2, "" using 1:3 title "shroud" lw 2
set title "One stream, 800 ms round trip"
plot "rtt-800.dat" using 1:2 title "plain TCP through the relay" lw 2, "" using 1:3 title "shroud" lw 2
unset multiplot
